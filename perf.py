"""What train.py and bench.py share to run fast and to report MFU: the datasheet peak FLOP/s of a GPU, and the
per-block activation-checkpoint + torch.compile wrapping (one copy, so the benchmark measures what training runs)."""
# bf16 dense tensor-core peak FLOP/s per device, first substring match on torch.cuda.get_device_name()
# (so the more specific names come first: 'H100 PCIe' before 'H100', 'A10G' before 'A10', 'L40S' before 'L4')
PEAK_FLOPS = [('GH200', 989e12), ('H200', 989e12), ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12),
              ('H800', 989e12), ('B200', 2250e12), ('A100', 312e12), ('A800', 312e12), ('A10G', 70e12),
              ('A10', 125e12), ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12), ('RTX 4090', 165e12),
              ('RTX 3090', 71e12), ('A6000', 155e12), ('V100', 125e12), ('T4', 65e12)]


def gpu_peak_flops(device_name):
    """The datasheet bf16 peak of a GPU named `device_name`, or 0.0 when it is not in PEAK_FLOPS."""
    return next((f for n, f in PEAK_FLOPS if n in device_name), 0.0)


def wrap_blocks(model, activation_checkpointing, compile_blocks):
    """Each transformer block in place: activation checkpointing (non-reentrant torch.utils.checkpoint:
    recompute the block in backward), then torch.compile. The state dict keys get the wrappers' prefixes
    (torch.distributed.checkpoint's get_state_dict strips them)."""
    if not (activation_checkpointing or compile_blocks):
        return
    import torch  # here, not at the top: train.py imports torch only after the config is checked
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i, block in enumerate(model.layers):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile_blocks:
            block = torch.compile(block)
        model.layers[i] = block
