"""The taskomatic benchmark: `bench/run` (see docs/benchmarks.md).

Modules:
    harness     command line, the measurement loop, alternation of subjects
    workloads   each workload as a function of a fresh database (sizes, metrics)
    databases   the throwaway PostgreSQL cluster and the SQLite files, bulk history, EXPLAIN
    procs       the `taskomatic dispatcher` process, CPU and memory accounting, py-spy
    profiling   statement counting inside a dispatcher, py-spy stack summaries
    report      medians, min-max, the printed table and the JSON results
    machine     what the figures were measured on
"""
