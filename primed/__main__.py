from primed.cli import main

raise SystemExit(main())
