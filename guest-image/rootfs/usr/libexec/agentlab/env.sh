# shellcheck shell=sh
# Environment for everything the guest starts: boot scripts, login shells (/etc/profile) and
# qemu-ga, whose environment guest-exec passes on when the host gives no "env".
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
USER=root
LOGNAME=root
SHELL=/bin/sh
# git lives where Debian puts it; setting these keeps it working if a tool resets PATH.
GIT_EXEC_PATH=/usr/lib/git-core
GIT_TEMPLATE_DIR=/usr/share/git-core/templates
# One CA bundle for git's libcurl and for programs that honour the OpenSSL variables.
GIT_SSL_CAINFO=/etc/ssl/certs/ca-certificates.crt
SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
SSL_CERT_DIR=/etc/ssl/certs
export PATH HOME USER LOGNAME SHELL GIT_EXEC_PATH GIT_TEMPLATE_DIR GIT_SSL_CAINFO SSL_CERT_FILE SSL_CERT_DIR
