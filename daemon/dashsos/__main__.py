from dashsos.cli import main

raise SystemExit(main())
