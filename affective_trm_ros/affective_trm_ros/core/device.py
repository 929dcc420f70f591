"""Device selection shared by the model and the encoders: chosen once, explicitly."""

import torch

DEVICE_CHOICES_HELP = "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(spec: str = 'auto') -> torch.device:
    """Turn a device string into a torch.device, failing clearly when CUDA was asked for but is absent."""
    spec = (spec or 'auto').strip().lower()
    if spec == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if spec == 'cpu':
        return torch.device('cpu')
    if spec == 'cuda' or spec.startswith('cuda:'):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{spec}' requested but CUDA is not available on this machine; "
                             f"use 'auto' or 'cpu'")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{spec}' requested but only {torch.cuda.device_count()} CUDA "
                             f"device(s) exist")
        return device
    raise ValueError(f"unknown device '{spec}'; expected {DEVICE_CHOICES_HELP}")
