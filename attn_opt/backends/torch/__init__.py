"""Lowering of forms to torch: FX graph edits, the forms in PyTorch, the torch.compile backend."""
