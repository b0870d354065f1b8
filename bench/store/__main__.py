import sys

from bench.store.run import main

sys.exit(main())
