"""The only code of megatron-eplb that knows Megatron-core and DeepSpeed internals.

Installed as ``megatron_eplb.patches``: ``megatron_eplb.patches.megatron`` (placement-aware MoE layers,
CPU support) and ``megatron_eplb.patches.deepspeed`` (engine wiring).  Importing this package imports
neither framework; the submodules do.
"""
