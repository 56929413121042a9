"""`python -m medai.cli`: the same as the `medai` console script."""

from medai.cli import main

main()
