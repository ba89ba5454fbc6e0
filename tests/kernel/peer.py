"""A second client process for the kernel tier.

It inherits a dma-buf fd, imports it on a DRM node of its own, exports the GEM
handle again and maps that, so what it reads went through the import. It prints
one JSON object: the handle, whether the re-export is the same dma-buf, the
SHA-256 of the pixels, or the errno of a failed import.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random

from primed import drm
from primed.buffer import Mapping
from primed.device import Device
from primed.errors import KernelError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument(
        "--write-seed", type=int, help="then overwrite the pixels with this pattern"
    )
    args = parser.parse_args()
    with Device(args.node) as device:
        try:
            imported = device.import_buffer(args.fd)
        except KernelError as e:
            print(json.dumps({"errno": e.errno}))
            return
        with imported:
            exported = drm.handle_to_fd(device.fd, imported.handle)
            try:
                same = os.fstat(exported).st_ino == os.fstat(args.fd).st_ino
                with Mapping(exported, args.size, write=True, sync=True) as pixels:
                    digest = hashlib.sha256(pixels).hexdigest()
                    if args.write_seed is not None:
                        pixels[:] = random.Random(args.write_seed).randbytes(args.size)
            finally:
                os.close(exported)
        print(json.dumps({"handle": imported.handle, "same_dmabuf": same, "sha256": digest}))


if __name__ == "__main__":
    main()
