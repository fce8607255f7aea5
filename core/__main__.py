from pgslowlog.cli import main

raise SystemExit(main())
