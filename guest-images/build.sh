#!/bin/bash
# Build the twinvm guest image from Debian packages only:
#   vmlinux          the guest kernel (uncompressed ELF, booted directly)
#   initramfs.cpio   an uncompressed newc initramfs (static busybox + our programs)
#   cmdline          the default kernel command line (guest-images/cmdline)
# Outputs are cached by the hash of every input in
#   ${TWINVM_CACHE:-$HOME/.cache/twinvm}/guest/<hash>/
# and guest-images/out is made a symlink to that directory. The last line on
# stdout is that directory; progress goes to stderr. See guest-images/README.md.
set -euo pipefail
shopt -s nullglob

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$(realpath -m "${TWINVM_CACHE:-$HOME/.cache/twinvm}")
KSRC_PKG=linux-source-6.12
KSRC_TAR=/usr/src/linux-source-6.12.tar.xz
BUSYBOX=/bin/busybox                     # from busybox-static

log() { echo "guest-images/build.sh: $*" >&2; }
die() { echo "guest-images/build.sh: error: $*" >&2; exit 1; }

# --- 1. dependencies: one clear line naming what to install ----------------
missing=()
for pkg in "$KSRC_PKG" busybox-static flex bison libelf-dev bc cpio xz-utils \
           gcc make libc6-dev patch; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $st == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    die "missing packages; install them with: apt-get install -y ${missing[*]}  (or run scripts/install-deps as root)"
fi
[[ -f $KSRC_TAR ]] || die "$KSRC_TAR not found; reinstall it with: apt-get install --reinstall -y $KSRC_PKG"
[[ -x $BUSYBOX ]] || die "$BUSYBOX not found; reinstall it with: apt-get install --reinstall -y busybox-static"

kver=$(dpkg-query -W -f='${Version}' "$KSRC_PKG")
bbver=$(dpkg-query -W -f='${Version}' busybox-static)

# --- 2. the input hash ------------------------------------------------------
# The inputs are first copied to a private snapshot, so that edits made while
# a build runs can't end up in an output cached under the old hash.
mkdir -p "$CACHE/guest"
SNAP=$(mktemp -d "$CACHE/guest/inputs.XXXXXX")
trap 'rm -rf "$SNAP"' EXIT
cp -a "$HERE/build.sh" "$HERE/cmdline" "$HERE/kernel" "$HERE/initramfs" "$HERE/programs" "$SNAP/"

# Each input file contributes its path (relative to guest-images), its mode and
# the sha256 of its content, so renames and chmod +x change the hash too.
hash_files() {
    local f
    for f in "$@"; do
        printf '%s %s %s\n' "${f#"$SNAP"/}" "$(stat -c %a "$f")" \
            "$(sha256sum <"$f" | cut -d' ' -f1)"
    done
}
mapfile -t patches < <(find "$SNAP/kernel/patches" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort)
mapfile -t inputs < <(find "$SNAP/kernel/config-fragment" "$SNAP/cmdline" "$SNAP/build.sh" \
                           "$SNAP/initramfs" "$SNAP/programs" -type f | LC_ALL=C sort)
src_hash=$( { echo "$KSRC_PKG $kver"; hash_files "${patches[@]}"; } | sha256sum | cut -c1-16)
hash=$( { echo "$KSRC_PKG $kver"; echo "busybox-static $bbver"; hash_files "${patches[@]}" "${inputs[@]}"; } \
        | sha256sum | cut -c1-16)

OUT=$CACHE/guest/$hash
link_out() {
    ln -sfn "$OUT" "$HERE/out"
    log "done: $OUT"
    echo "$OUT"
}
if [[ -f $OUT/.complete ]]; then
    log "cached (inputs hash $hash)"
    rm -rf "$SNAP"
    link_out
    exit 0
fi

# --- 3. kernel source tree: extracted + patched once per (version, patches) --
# The tree doubles as the build directory, so a config change rebuilds only
# what it affects. A lock serialises builds that share the tree.
KSRC=$CACHE/kernel-src-$src_hash
exec 9>"$KSRC.lock"
flock 9
if [[ -f $OUT/.complete ]]; then      # built by another build.sh while we waited
    rm -rf "$SNAP"
    trap - EXIT
    link_out
    exit 0
fi
if [[ ! -f $KSRC/.twinvm-prepared ]]; then
    rm -rf "$KSRC" "$KSRC.tmp"
    mkdir -p "$KSRC.tmp"
    log "extracting $KSRC_TAR ($KSRC_PKG $kver) into $KSRC"
    tar -xf "$KSRC_TAR" -C "$KSRC.tmp" --strip-components=1
    for p in "${patches[@]}"; do
        log "applying ${p#"$SNAP"/}"
        patch -p1 -N -s -d "$KSRC.tmp" <"$p" >&2 || die "patch ${p#"$SNAP"/} does not apply to $KSRC_PKG $kver"
    done
    touch "$KSRC.tmp/.twinvm-prepared"
    mv "$KSRC.tmp" "$KSRC"
fi

# --- 4. kernel config: tinyconfig + our fragment, then verified ------------
FRAG=$SNAP/kernel/config-fragment
log "configuring: make tinyconfig + kernel/config-fragment"
make -C "$KSRC" -s tinyconfig >&2
"$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KSRC" "$KSRC/.config" "$FRAG" >/dev/null
make -C "$KSRC" -s olddefconfig >&2

bad=0
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]}
        if ! grep -qxF -- "$line" "$KSRC/.config"; then
            got=$(grep -E "^$sym=|^# $sym is not set" "$KSRC/.config" || echo "absent")
            log "config: fragment wants '$line', final .config has '$got'"
            bad=1
        fi
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        if got=$(grep -E "^$sym=" "$KSRC/.config"); then
            log "config: fragment wants '$sym' unset, final .config has '$got'"
            bad=1
        fi
    fi
done <"$FRAG"
((bad == 0)) || die "the final kernel .config does not honour kernel/config-fragment (see above): a dependency is missing or the option no longer exists"
log "config verified: every option of kernel/config-fragment is in .config"

# --- 5. kernel build ----------------------------------------------------------
# Reproducible: primary and backup hosts that each build the image must get
# the same bytes (the kernel's version string and its built-in initramfs are
# in guest memory, which the replay digests compare), so fix what kbuild would
# take from the clock, the user, the host name and the build counter. The
# date is the source tarball's mtime, which dpkg sets from the package.
KBUILD_BUILD_TIMESTAMP=$(date -u -d "@$(stat -c %Y "$KSRC_TAR")" '+%Y-%m-%d %H:%M:%S UTC')
export KBUILD_BUILD_TIMESTAMP KBUILD_BUILD_USER=twinvm KBUILD_BUILD_HOST=twinvm KBUILD_BUILD_VERSION=1
log "building vmlinux with make -j$(nproc) in $KSRC (a full build takes minutes)"
make -C "$KSRC" -j"$(nproc)" vmlinux >&2 || die "kernel build failed (see the make output above)"

# --- 6. initramfs ---------------------------------------------------------------
TMP=$(mktemp -d "$CACHE/guest/$hash.tmp.XXXXXX")
chmod 755 "$TMP"
trap 'rm -rf "$SNAP" "$TMP"' EXIT
ROOT=$TMP/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,usr/share/twinvm/run}
chmod 1777 "$ROOT/tmp"
chmod 700 "$ROOT/root"
cp -a "$SNAP/initramfs/." "$ROOT/"

# All of programs/NAME.c go into one static multi-call binary (static glibc
# costs ~700 KB per binary, and the slow guest kernel unpacks the initramfs
# at ~3 s per MB): each file's main() is renamed twinvm_NAME_main, a generated
# dispatcher picks one by argv[0], and /usr/bin/twinvm-NAME links to it.
log "compiling in-guest programs (gcc -static -O2, one multi-call binary)"
mkdir -p "$TMP/obj"
progs=()
for c in "$SNAP"/programs/*.c; do
    name=$(basename "$c" .c)
    [[ $name =~ ^[a-z][a-z0-9_]*$ ]] || die "programs/$name.c: name must match [a-z][a-z0-9_]*"
    gcc -O2 -Wall -Wextra -Dmain="twinvm_${name}_main" -c -o "$TMP/obj/$name.o" "$c" \
        || die "compiling programs/$name.c failed"
    progs+=("$name")
done
{
    echo '#include <stdio.h>'
    echo '#include <string.h>'
    for name in "${progs[@]}"; do echo "int twinvm_${name}_main(int, char **);"; done
    echo 'static const struct { const char *name; int (*main)(int, char **); } progs[] = {'
    for name in "${progs[@]}"; do echo "    { \"twinvm-$name\", twinvm_${name}_main },"; done
    echo '};'
    echo 'int main(int argc, char **argv)'
    echo '{'
    echo '    const char *base = strrchr(argv[0], 0x2f) ? strrchr(argv[0], 0x2f) + 1 : argv[0];'
    echo '    for (size_t i = 0; i < sizeof progs / sizeof progs[0]; i++)'
    echo '        if (!strcmp(base, progs[i].name))'
    echo '            return progs[i].main(argc, argv);'
    echo '    fprintf(stderr, "twinvm-programs: run me as one of:");'
    echo '    for (size_t i = 0; i < sizeof progs / sizeof progs[0]; i++)'
    echo '        fprintf(stderr, " %s", progs[i].name);'
    echo '    fprintf(stderr, "\n");'
    echo '    return 127;'
    echo '}'
} >"$TMP/obj/dispatch.c"
if ((${#progs[@]})); then
    gcc -static -O2 -Wall -o "$ROOT/usr/bin/twinvm-programs" "$TMP/obj/dispatch.c" "$TMP/obj"/*.o \
        || die "linking the in-guest programs failed"
    strip "$ROOT/usr/bin/twinvm-programs"
    for name in "${progs[@]}"; do ln -s twinvm-programs "$ROOT/usr/bin/twinvm-$name"; done
fi
rm -rf "$TMP/obj"

cp "$BUSYBOX" "$ROOT/bin/busybox"
n=0
while IFS= read -r applet; do
    [[ -e $ROOT/$applet || -L $ROOT/$applet ]] && continue
    ln -s /bin/busybox "$ROOT/$applet"
    n=$((n + 1))
done < <("$BUSYBOX" --list-full)
log "busybox-static $bbver with $n applet links"

# The list for the kernel's own gen_init_cpio: no root needed for device
# nodes, owner root, every mtime 0 (so the archive is reproducible).
gcc -O2 -o "$TMP/gen_init_cpio" "$KSRC/usr/gen_init_cpio.c"
{
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "nod /dev/null 0666 0 0 c 1 3"
    (cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort) | while IFS= read -r p; do
        name=${p#.}
        if [[ -L $ROOT$name ]]; then
            echo "slink $name $(readlink "$ROOT$name") 0777 0 0"
        elif [[ -d $ROOT$name ]]; then
            echo "dir $name $(stat -c %a "$ROOT$name") 0 0"
        else
            echo "file $name $ROOT$name $(stat -c %a "$ROOT$name") 0 0"
        fi
    done
} >"$TMP/cpio.list"
"$TMP/gen_init_cpio" -t 0 "$TMP/cpio.list" >"$TMP/initramfs.cpio"
listing=$(cpio -it --quiet <"$TMP/initramfs.cpio")
grep -qxE '/?init' <<<"$listing" || die "initramfs.cpio has no /init"

# --- 7. outputs ------------------------------------------------------------------
cp "$KSRC/vmlinux" "$TMP/vmlinux"
cp "$KSRC/.config" "$TMP/config"
cp "$KSRC/System.map" "$TMP/System.map"
tr -s ' \n' ' ' <"$SNAP/cmdline" | sed 's/ $//' >"$TMP/cmdline"
echo >>"$TMP/cmdline"
rm -rf "$ROOT" "$TMP/gen_init_cpio" "$TMP/cpio.list"
touch "$TMP/.complete"
rm -rf "$OUT"
mv "$TMP" "$OUT"
rm -rf "$SNAP"
trap - EXIT
log "vmlinux $(stat -c %s "$OUT/vmlinux") bytes, initramfs.cpio $(stat -c %s "$OUT/initramfs.cpio") bytes"
link_out
