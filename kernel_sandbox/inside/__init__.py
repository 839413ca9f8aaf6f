"""What runs INSIDE the sandbox: standard library only, copied whole into the kernel image.

- :mod:`.contract`: the host/container boundary (paths, file and socket names, labels, exit
  codes), defined once and imported by both sides;
- :mod:`.watchdog`: starts the kernel and ends it when its host-side owner is gone;
- :mod:`.egress_bridge`: the loopback bridge to the host's egress proxy (and the IPython
  extension that shows its denials in the cell);
- :mod:`.data`: the data client (``from kernel_sandbox import data``) and the wire format the
  host's data broker speaks too.

The host imports public names from here, never the reverse: nothing in this folder may import
from the rest of the package.
"""
