#!/bin/sh
# The Debian font packages that benchmarks/domainbed_mini v2 renders its related auxiliaries from
# (data_v2.FONT_PACKAGES; none of their files is among the foundation's pretraining fonts). Run as root
# once per machine before `run.py --config v2*` (`make system-deps`, which `make test` runs, does it too).
set -eu
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    fonts-noto-core fonts-comic-neue fonts-humor-sans fonts-femkeklaver fonts-breip \
    fonts-dkg-handwriting fonts-bwht fonts-dancingscript fonts-kaushanscript fonts-kristi
