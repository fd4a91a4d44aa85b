"""One module per training framework, each making that framework's own checkpoints safe with one line.

- ``safepoint.integrations.lightning``: ``SafepointCheckpointIO`` for Lightning's ``Trainer`` and ``Fabric``, and a
  verified ``load_from_checkpoint``.
- ``safepoint.integrations.transformers``: ``SafepointTrainerMixin`` for the Transformers ``Trainer`` and TRL's
  trainers.
- ``safepoint.integrations.accelerate``: ``save_state`` and ``load_state`` for an ``Accelerator``.

Each module imports its framework when it is imported (never this package) and uses only the public ``safepoint``
API. Without the framework installed, importing the module raises an ImportError naming the extra to install
(``pip install 'safepoint[lightning]'``, ``[transformers]``, ``[accelerate]``).
"""
