# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
The configuration file of a test's containerd (L{spegel_testing.containerd.ContainerdDaemon}),
in the format of its version: C{version = 2} with the CRI plugin's C{io.containerd.grpc.v1.cri}
sections for 1.x, C{version = 3} with C{io.containerd.cri.v1.images}/C{runtime} for 2.x.  The
CRI plugin is disabled unless the daemon runs it; the optional plugins that write outside the
daemon's root or probe hardware filesystems are always off.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spegel_testing.containerd import ContainerdDaemon

_DISABLED_PLUGINS = (
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.tracing.processor.v1.otlp",
    # One socket per machine (/var/run/nri): daemons side by side would fight over it.
    "io.containerd.nri.v1.nri",
)

# The CRI plugin of 1.x; of 2.x it is split in three.
_CRI_PLUGINS = {
    2: ("io.containerd.grpc.v1.cri",),
    3: ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"),
}

_COMMON = """\
version = {config_version}
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = ""
  level = "{log_level}"

[metrics]
  address = ""
"""

# Where the CRI plugin finds registry configuration, and whether it keeps layers. Written also
# when the plugin is disabled (containerd ignores it then), so the file always says where this
# daemon's mirrors are configured: `spegel configuration` checks that before writing there.
_IMAGES_V2 = """
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = {discard}

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{hosts_dir}"
"""

_IMAGES_V3 = """
[plugins.'io.containerd.cri.v1.images']
  discard_unpacked_layers = {discard}

[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = '{hosts_dir}'
"""

# root lacks CAP_SYS_RESOURCE in this sandbox, so pods need restrict_oom_score_adj. No CNI is
# configured: pulls and host-network sandboxes need none.
_RUNTIME_V2 = """
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
{sandbox}
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{cni}/bin"
  conf_dir = "{cni}/conf"
"""

_RUNTIME_V3 = """
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ['{cni}/bin']
  conf_dir = '{cni}/conf'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
"""

# The image of every pod's sandbox ("pause") container, when a test runs pods.
_SANDBOX_V3 = """
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = '{image}'
"""


def config_text(daemon: ContainerdDaemon) -> str:
    """
    C{daemon}'s configuration file, in the format of its containerd's version.
    """
    version = daemon.build.config_version
    disabled = list(_DISABLED_PLUGINS)
    if not daemon.cri:
        disabled = list(_CRI_PLUGINS[version]) + disabled
    text = _COMMON.format(
        config_version=version,
        root=daemon.root,
        state=daemon.state,
        disabled=", ".join(f'"{p}"' for p in disabled),
        socket=daemon.socket,
        ttrpc=daemon.socket + ".ttrpc",
        log_level=daemon.log_level,
    )
    text += (_IMAGES_V3 if version == 3 else _IMAGES_V2).format(
        discard="true" if daemon.discard_unpacked_layers else "false", hosts_dir=daemon.hosts_dir
    )
    if daemon.cri:
        sandbox = f'  sandbox_image = "{daemon.sandbox_image}"\n' if daemon.sandbox_image else ""
        text += (_RUNTIME_V3 if version == 3 else _RUNTIME_V2).format(
            cni=os.path.join(daemon.base_dir, "cni"), sandbox=sandbox
        )
        if daemon.sandbox_image and version == 3:
            text += _SANDBOX_V3.format(image=daemon.sandbox_image)
    return text
