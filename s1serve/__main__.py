from s1serve.cli import main

raise SystemExit(main())
