"""sovereign_portal.spawners: the size vocabulary and the backends that run granted requests.

Nothing here imports ``sovereign_portal.hub`` or ``sovereign_portal.extension``.
"""

from .catalog import ACCELERATORS, Accelerator, MigProfile, check_layout
from .request import Request, RequestError, Resolved, parse_request, resolve
from .site import Partition, Site, SiteError, load_site
from .sizes import Size, partition_sizes

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "MigProfile",
    "Partition",
    "Request",
    "RequestError",
    "Resolved",
    "Site",
    "SiteError",
    "Size",
    "check_layout",
    "load_site",
    "parse_request",
    "partition_sizes",
    "resolve",
]
