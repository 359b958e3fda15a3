from qrproxy.cli.main import main

raise SystemExit(main())
