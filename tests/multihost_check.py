"""One process of a 2-process CPU run (``jax.distributed`` on localhost, gloo collectives).

Started twice by tests/test_multihost.py: ``python -m tests.multihost_check PORT PROCESS_ID WORKDIR``.
"""

from __future__ import annotations

import sys

import jax


def main(port: str, process_id: str, workdir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()

    from hdml_jax.training import train
    from tests.test_train import tiny_config
    from tests.tiny_data import tiny_dataset

    config = tiny_config("hpl_pa", log_every_steps=1)  # as tests/test_multihost.py's one-process run
    final = train.train_and_evaluate(config, workdir, dataset=tiny_dataset())
    print("recall@1", final["recall@1"], flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
