"""`python -m bench`: the benchmark command (bench/run sets up the environment first)."""

from bench.harness import main

raise SystemExit(main())
