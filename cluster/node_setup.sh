#!/usr/bin/env bash
# Every node (ray_cluster.yaml and ray_cluster_onprem.yaml, setup_commands): a venv with
# the project installed, built once per project folder and pyproject.toml (a marker named
# after their hash). The install is editable, so a `ray up` that only changed the code
# (file_mounts copies it in place) installs nothing: seconds, not torch's gigabytes.
set -euo pipefail
. "$(dirname "$0")/settings.sh"

if ! command -v "$GMWAE_PYTHON" >/dev/null; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$GMWAE_PYTHON" "$GMWAE_PYTHON-venv"
fi
mark="$GMWAE_VENV/.deps-$( { printf '%s\n' "$GMWAE_PROJECT"; cat "$GMWAE_PROJECT/pyproject.toml"; } |
    sha256sum | cut -c1-12)"
if [ ! -f "$mark" ]; then
    "$GMWAE_PYTHON" -m venv "$GMWAE_VENV"
    "$GMWAE_VENV/bin/pip" install -q -e "$GMWAE_PROJECT${GMWAE_EXTRAS:+[$GMWAE_EXTRAS]}"
    rm -f "$GMWAE_VENV"/.deps-*
    touch "$mark"
fi
# Ray's login shells (`ray down` runs `ray stop` in one) find the venv's commands.
case ":$PATH:" in
    *":$GMWAE_VENV/bin:"*) ;;
    *) grep -qsF "$GMWAE_VENV/bin" "$GMWAE_BASHRC" ||
           echo "export PATH=\"$GMWAE_VENV/bin:\$PATH\"" >> "$GMWAE_BASHRC" ;;
esac
