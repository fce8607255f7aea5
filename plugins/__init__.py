"""The plugins shipped with pgslowlog, registered through the same hooks as any other."""
