from demuon.app.cli import main

raise SystemExit(main())
