"""What every way of training shares: the born-sharded state and the jitted step
(``core.step``), run setup and the run directory (``core.setup``), and the loop with its
checkpoints, resume, SIGTERM, logging, evaluation, report and export (``core.loop``).

What differs between SFT, a reward model, DPO or PPO is an *objective*
(``sft_jax.objectives``): the batch's arrays and logical shardings, the loss as a pure
function of (params, frozen params, batch), what to evaluate and how to export.
"""
