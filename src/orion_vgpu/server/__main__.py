"""`python -m orion_vgpu.server [--config PATH]`: same as `oriond`."""

from orion_vgpu.cli import oriond_main

if __name__ == "__main__":
    raise SystemExit(oriond_main())
