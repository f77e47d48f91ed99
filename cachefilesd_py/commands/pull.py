"""``nydus-erofs pull REF --address CONTAINERD_SOCK``: a Nydus image into containerd, blobs left in the registry
(:mod:`cachefilesd_py.snapshotter.pull`); other images are pulled by ``ctr image pull``.

Exit codes: 0 ok; 2 bad options; 4 registry error; 5 containerd refused.
"""

from __future__ import annotations

import click

from cachefilesd_py.snapshotter.pull import pull as pull_image


@click.command()
@click.argument("ref")
@click.option("--address", default="/run/containerd/containerd.sock", show_default=True,
              type=click.Path(dir_okay=False), help="containerd's socket.")  # fmt: skip
@click.option("--snapshotter", default="nydus-erofs", show_default=True, help="containerd's name for the snapshotter.")
@click.option("--namespace", default="default", show_default=True, help="containerd namespace.")
@click.option("--plain-http", is_flag=True, help="Reach the registry over HTTP, without TLS.")
@click.option("--platform", default=None, help="os/arch[/variant] to pull [the host's].")
def pull(ref: str, address: str, snapshotter: str, namespace: str, plain_http: bool, platform: str | None) -> None:
    """Pull REF into containerd; a Nydus image's layers are not downloaded (its files are, as containers read them)."""
    result = pull_image(ref, address, snapshotter=snapshotter, namespace=namespace, plain_http=plain_http,
                        platform=platform)  # fmt: skip
    if result.nydus:
        click.echo(f"{result.name}: Nydus image {result.manifest_digest}, {result.layers} layer(s), none downloaded")
    else:
        click.echo(f"{result.name}: pulled and unpacked (not a Nydus image)")
