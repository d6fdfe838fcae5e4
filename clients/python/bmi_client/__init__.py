"""Python client and ``bmi`` CLI for the BMI (Bare Metal Imaging) gRPC API."""

from bmi_client.client import BmiClient
from bmi_client.config import ClientConfig, ConfigError, load_config

__all__ = ["BmiClient", "ClientConfig", "ConfigError", "load_config"]
