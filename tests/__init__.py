"""The test suite.

gRPC's fork support is turned off for the test process before anything
imports grpc. The tests fork only to exec (pg_ctl and initdb dropped to the
postgres user, processes started with a ``preexec_fn``: Python cannot use
vfork for those), and with fork support on, gRPC's after-fork handler starts
a poller thread in the child, which can crash it before the exec
(grpc/grpc#43055): a CI run lost its PostgreSQL cluster, and 143 tests, to
"pg_ctl start failed (-11)" and "Epoll1Poller ... epoll_wait error: Bad file
descriptor". ``tests/test_forking.py`` checks it.
"""

import os

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
