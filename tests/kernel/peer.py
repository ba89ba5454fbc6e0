"""A second client process for the kernel tier.

It gets a dma-buf fd (inherited with --fd, received over an inherited socket
with --channel, or opened from the daemon with --token and --socket), imports
it on a DRM node of its own, exports the GEM handle again and maps that, so
what it reads went through the import. It prints one JSON object: the handle,
whether the re-export is the same dma-buf, the SHA-256 of the pixels, or the
errno of a failed import.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket

import primed
from primed.client.buffer import Mapping
from primed.client.device import Device
from primed.errors import KernelError
from primed.kernel import drm


def main() -> None:
    parser = argparse.ArgumentParser()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fd", type=int, help="an inherited dma-buf fd")
    source.add_argument("--channel", type=int, help="an inherited socket to recv_buffer() from")
    source.add_argument("--token", help="a share token to open (with --socket)")
    parser.add_argument("--socket", help="the daemon's socket")
    parser.add_argument("--node", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument(
        "--write-seed", type=int, help="then overwrite the pixels with this pattern"
    )
    args = parser.parse_args()
    if args.channel is not None:
        with socket.socket(fileno=args.channel) as channel:
            args.fd = primed.recv_buffer(channel).detach()
    elif args.token is not None:
        with primed.connect(args.socket, name="peer") as client:
            try:
                args.fd = client.open_shared(args.token).detach()
            except primed.ServerError as e:
                print(json.dumps({"error": e.code.name}))
                return
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
