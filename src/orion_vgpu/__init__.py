"""orion-vgpu: GPU pooling and virtualization for unmodified PyTorch programs."""

__version__ = "0.1.0"
# Versions the seeds' `orion-check` prints ("api_version=0.1,data_version=0.1").
API_VERSION = "0.1"
DATA_VERSION = "0.1"
# Data-plane wire protocol; client and server must agree exactly.
PROTOCOL_VERSION = 1

DEFAULT_CONTROLLER_PORT = 9123
DEFAULT_SERVER_PORT = 9960
