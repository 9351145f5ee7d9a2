import sys

from callback_server.cli import main

sys.exit(main())
