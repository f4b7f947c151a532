#!/usr/bin/env bash
# Makes the X.509 credentials of the TLS key matrix (tests/tls_keys.rs): one
# directory per kind of key a user's CA may issue, each in the layout
# qemu-nbd, nbdkit and `livemirror serve --tls-certs` read:
#
#   KIND/ca-cert.pem      the CA that signed both certificates
#   KIND/server-cert.pem  the server's chain, leaf first (CN and SAN localhost, 127.0.0.1)
#   KIND/server-key.pem   its key
#   KIND/client-cert.pem  a client certificate (for --tls-verify-peer)
#   KIND/client-key.pem   its key
#
# The results are committed (an 8192-bit RSA key takes a minute to make), so
# this only runs again when the matrix changes:
#
#   tests/certs/make.sh [DIR]        # default: the directory of this script
#
# nbd-reference/ is not made here: it holds the test certificates of the
# reference NBD server (NetworkBlockDevice/nbd, tests/run/certs; public
# domain, see its README.md), a 2432-bit RSA key made by certtool.
set -euo pipefail
out="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
days=7300

genkey() { # OUT KIND
    case "$2" in
    rsa*) openssl genpkey -algorithm RSA -pkeyopt "rsa_keygen_bits:${2#rsa}" -out "$1" 2>/dev/null ;;
    p256) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" ;;
    p384) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$1" ;;
    p521) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out "$1" ;;
    secp256k1) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:secp256k1 -out "$1" ;;
    ed25519 | ed448) openssl genpkey -algorithm "$2" -out "$1" ;;
    *) echo "unknown key kind $2" >&2; exit 2 ;;
    esac
}

ca() { # DIR KIND NAME
    genkey "$1/ca-key.pem" "$2"
    openssl req -x509 -new -key "$1/ca-key.pem" -subj "/CN=$3" -days "$days" -out "$1/ca-cert.pem" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}

sign() { # CADIR KEY OUTCERT SUBJECT EXTFILE
    openssl req -new -key "$2" -subj "$4" -out "$3.csr" 2>/dev/null
    openssl x509 -req -in "$3.csr" -CA "$1/ca-cert.pem" -CAkey "$1/ca-key.pem" -set_serial "0x$(openssl rand -hex 8)" \
        -days "$days" -extfile "$5" -out "$3" 2>/dev/null
    rm -f "$3.csr"
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$tmp/server.ext"
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$tmp/client.ext"
printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n' >"$tmp/intermediate.ext"

kind_dir() { # DIR KIND [CLIENTKIND]: a CA, server and client of KIND
    local d="$out/$1"
    rm -rf "$d" && mkdir -p "$d"
    ca "$tmp" "$2" "livemirror matrix CA ($1)"
    cp "$tmp/ca-cert.pem" "$d/"
    genkey "$d/server-key.pem" "$2"
    sign "$tmp" "$d/server-key.pem" "$d/server-cert.pem" "/CN=localhost" "$tmp/server.ext"
    genkey "$d/client-key.pem" "${3:-$2}"
    sign "$tmp" "$d/client-key.pem" "$d/client-cert.pem" "/CN=client" "$tmp/client.ext"
}

# What a CA may issue and every peer (gnutls: qemu-nbd, nbdkit, nbd-server)
# accepts. PKCS#8 is what `openssl genpkey` writes.
for k in rsa2048 rsa3072 rsa4096 rsa8192 p256 p384 p521 ed25519 ed448; do
    kind_dir "$k" "$k" rsa2048
done
# The traditional encodings: PKCS#1 for RSA, SEC1 for EC.
kind_dir rsa2048-pkcs1 rsa2048
openssl rsa -in "$out/rsa2048-pkcs1/server-key.pem" -traditional -out "$tmp/key.pem" 2>/dev/null
mv "$tmp/key.pem" "$out/rsa2048-pkcs1/server-key.pem"
kind_dir p256-sec1 p256
openssl ec -in "$out/p256-sec1/server-key.pem" -out "$tmp/key.pem" 2>/dev/null
mv "$tmp/key.pem" "$out/p256-sec1/server-key.pem"
# certtool's own keys (qemu's and nbdkit's documentation make them so).
d="$out/certtool-ec"
rm -rf "$d" && mkdir -p "$d"
ca "$tmp" p256 "livemirror matrix CA (certtool-ec)"
cp "$tmp/ca-cert.pem" "$d/"
certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 --no-text --outfile "$d/server-key.pem" 2>/dev/null
sign "$tmp" "$d/server-key.pem" "$d/server-cert.pem" "/CN=localhost" "$tmp/server.ext"
certtool --generate-privkey --key-type=rsa --bits=3072 --no-text --outfile "$d/client-key.pem" 2>/dev/null
sign "$tmp" "$d/client-key.pem" "$d/client-cert.pem" "/CN=client" "$tmp/client.ext"
# A chain: root CA -> intermediate CA -> leaf; server-cert.pem holds the leaf
# and the intermediate, ca-cert.pem the root only (the client certificate is
# signed by the intermediate too, and sent with it).
d="$out/chain"
rm -rf "$d" && mkdir -p "$d" "$tmp/root" "$tmp/mid"
ca "$tmp/root" p384 "livemirror matrix root CA"
genkey "$tmp/mid/ca-key.pem" p256
sign "$tmp/root" "$tmp/mid/ca-key.pem" "$tmp/mid/ca-cert.pem" "/CN=livemirror matrix intermediate CA" "$tmp/intermediate.ext"
cp "$tmp/root/ca-cert.pem" "$d/"
genkey "$d/server-key.pem" rsa3072
sign "$tmp/mid" "$d/server-key.pem" "$tmp/leaf.pem" "/CN=localhost" "$tmp/server.ext"
cat "$tmp/leaf.pem" "$tmp/mid/ca-cert.pem" >"$d/server-cert.pem"
genkey "$d/client-key.pem" p256
sign "$tmp/mid" "$d/client-key.pem" "$tmp/cleaf.pem" "/CN=client" "$tmp/client.ext"
cat "$tmp/cleaf.pem" "$tmp/mid/ca-cert.pem" >"$d/client-cert.pem"

# Refused, each for a reason the daemon must name.
kind_dir refused-rsa1024 rsa1024
kind_dir refused-secp256k1 secp256k1 p256
kind_dir refused-encrypted p256
openssl pkey -in "$out/refused-encrypted/server-key.pem" -aes-256-cbc -passout pass:secret -out "$tmp/key.pem"
mv "$tmp/key.pem" "$out/refused-encrypted/server-key.pem"
kind_dir refused-mismatch p256
genkey "$out/refused-mismatch/server-key.pem" p256
echo "made the matrix in $out"
