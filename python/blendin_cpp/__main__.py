"""python -m blendin_cpp: see blendin_cpp.cli."""
import sys

from .cli import main

sys.exit(main())
