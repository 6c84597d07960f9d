"""The gateway's YAML config: its schema (`schema`) and its loading with every problem listed (`loading`).

A leaf of the gateway: it imports only `routers` (the policy specs), never another part of `server`. Everything
else imports its names from here.
"""

from server.config.loading import field_path, load_config, parse_config
from server.config.schema import (
    AuthConfig,
    ConfigError,
    EmbedderConfig,
    KeyConfig,
    Price,
    ReliabilityConfig,
    ServerConfig,
    StateConfig,
    Timeouts,
    TurnoutConfig,
    UpstreamConfig,
    WorkerConfig,
    check_http_url,
)

__all__ = [
    "AuthConfig",
    "ConfigError",
    "EmbedderConfig",
    "KeyConfig",
    "Price",
    "ReliabilityConfig",
    "ServerConfig",
    "StateConfig",
    "Timeouts",
    "TurnoutConfig",
    "UpstreamConfig",
    "WorkerConfig",
    "check_http_url",
    "field_path",
    "load_config",
    "parse_config",
]
