from monoray.cli import main

raise SystemExit(main())
