#!/usr/bin/env bash
# Install the system programs that the orthanc and browser tests use, when missing.
# Idempotent: does nothing when Orthanc (with DICOMweb), dcmtk, dicom3tools and Chromium are present.
set -euo pipefail
need=()
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || need+=(orthanc-dicomweb)
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo -n"
else
  SUDO=""
fi
echo "medai: installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/medai-apt.log 2>&1; then
  $SUDO apt-get update -q >>/tmp/medai-apt.log 2>&1
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/medai-apt.log 2>&1 \
    || { echo "medai: apt-get failed, see /tmp/medai-apt.log" >&2; tail -20 /tmp/medai-apt.log >&2; exit 1; }
fi
# Debian starts an Orthanc service on install; the tests start their own on loopback.
$SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true
$SUDO service orthanc stop >/dev/null 2>&1 || true
