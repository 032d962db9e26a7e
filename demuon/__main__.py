from demuon.cli import main

raise SystemExit(main())
