import sys

from safe_redirect.cli import main

sys.exit(main())
