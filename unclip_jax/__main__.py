import sys

from unclip_jax.cli import main

sys.exit(main())
