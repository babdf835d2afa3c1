"""The core scenarios of benches/core.rs, on the Python `transaction` package.

Prints one JSON object: scenario name -> nanoseconds per iteration (best of
several repeats). Run by run.sh, which makes the virtualenv.
"""
import json
import sys
import timeit

import transaction


class NoOpSavepoint:
    def rollback(self):
        pass


class NoOp:
    """A data manager that does nothing, like benches/core.rs's NoOp."""

    def __init__(self, name):
        self.name = name
        self.transaction_manager = None

    def sortKey(self):
        return self.name

    def abort(self, txn):
        pass

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        pass

    def savepoint(self):
        return NoOpSavepoint()


def best_ns(fn, number):
    times = timeit.repeat(fn, number=number, repeat=7)
    return min(times) / number * 1e9


def main():
    results = {}
    for n in (0, 1, 4, 16):
        tm = transaction.TransactionManager(explicit=True)
        dms = [NoOp("noop%02d" % i) for i in range(n)]

        def begin_commit(tm=tm, dms=dms):
            txn = tm.begin()
            for dm in dms:
                txn.join(dm)
            tm.commit()

        results["begin_commit/%d" % n] = best_ns(begin_commit, 20000)

    tm = transaction.TransactionManager(explicit=True)
    dm = NoOp("noop00")

    def attempts():
        for attempt in tm.attempts():
            with attempt as txn:
                txn.join(dm)

    results["retry_loop/attempts_1_resource"] = best_ns(attempts, 20000)

    def run():
        tm.run(lambda: tm.get().join(dm))

    results["retry_loop/run_1_resource"] = best_ns(run, 20000)

    tm = transaction.TransactionManager(explicit=True)
    txn = tm.begin()
    for i in range(4):
        txn.join(NoOp("noop%02d" % i))

    def savepoint_rollback():
        txn.savepoint().rollback()

    results["savepoint_rollback_4_resources"] = best_ns(savepoint_rollback, 20000)
    tm.abort()

    json.dump(
        {"python": sys.version.split()[0], "transaction": transaction_version(), "ns": results},
        sys.stdout,
    )


def transaction_version():
    try:
        from importlib.metadata import version

        return version("transaction")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


if __name__ == "__main__":
    main()
