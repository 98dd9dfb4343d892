"""What every command accepts as a checkpoint, said once for every --help."""

SOURCES = (
    "a torch file (zip, legacy or TorchScript), a .safetensors file, a sharded model directory "
    "or its index .json, or a torch.distributed.checkpoint (DCP) directory"
)
