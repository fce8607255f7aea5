"""The one error type a user ever sees: a mistake they can fix, said in one line."""


class UserError(Exception):
    """Printed as ``pgslowlog: <cause>; <fix>`` with exit status 2, never as a traceback."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}; {fix}")
        self.cause = cause
        self.fix = fix
