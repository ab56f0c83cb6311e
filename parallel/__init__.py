"""How a built model is spread over devices: the rank grid (dims), data parallel (FSDP2/HSDP)."""
