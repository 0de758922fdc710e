from kdistill.cli import main

raise SystemExit(main())
