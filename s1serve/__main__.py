from s1serve.entrypoints.cli import main

raise SystemExit(main())
