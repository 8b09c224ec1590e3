"""Programs built on fencelock, not part of its library: the race reproduction
(`fencelock.tools.repro`, ``fencelock-repro``) and the benchmark (`fencelock.tools.bench`,
``fencelock-bench``, measuring the locks in `peers`, with its etcd section in
`bench_etcd`; `bench_hold` is ``fencelock-bench-hold``); `checkout` runs them, and the
command line, from the scripts in ``bin/``.

They use fencelock's public API; where one needs an internal (the benchmark's protocol
floor needs the record layout), it imports it by name and says why.
"""
