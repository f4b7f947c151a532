#!/usr/bin/env bash
# Makes throw-away TLS credentials for the tests and benchmarks, in the
# layouts qemu and libnbd read (certtool and psktool: Debian's gnutls-bin).
#
#   tests/scripts/tls_creds.sh DIR
#
# DIR/server   ca-cert.pem server-cert.pem server-key.pem   (livemirror --tls-certs,
#                                                              qemu-nbd, nbdkit)
# DIR/client   ca-cert.pem client-cert.pem client-key.pem   (a client our CA signed)
# DIR/anon     ca-cert.pem                                  (a client without a certificate)
# DIR/rogue    ca-cert.pem client-cert.pem client-key.pem   (another CA and a client it signed)
# DIR/distrust ca-cert.pem                                  (a client that trusts only the other CA)
# DIR/psk/keys.psk        identity "alice" (qemu's tls-creds-psk reads DIR/keys.psk)
# DIR/psk-wrong/keys.psk  "alice" with another key
# DIR/psk-bob/keys.psk    an identity the server does not know
# The server certificate names localhost and 127.0.0.1.
set -euo pipefail
dir="$1"
mkdir -p "$dir"/{ca,server,client,anon,rogue,rogue-ca,distrust,psk,psk-wrong,psk-bob}
cd "$dir"

key() { certtool --generate-privkey --key-type=rsa --bits=2048 --no-text --outfile "$1" 2>/dev/null; }

ca() { # ca DIR NAME
    key "$1/ca-key.pem"
    printf 'cn = %s\nca\ncert_signing_key\nexpiration_days = 3650\n' "$2" >"$1/ca.info"
    certtool --generate-self-signed --load-privkey "$1/ca-key.pem" --template "$1/ca.info" \
        --no-text --outfile "$1/ca-cert.pem" 2>/dev/null
}

signed() { # signed CADIR OUTKEY OUTCERT TEMPLATE
    key "$2"
    certtool --generate-certificate --load-privkey "$2" --load-ca-certificate "$1/ca-cert.pem" \
        --load-ca-privkey "$1/ca-key.pem" --template "$4" --no-text --outfile "$3" 2>/dev/null
}

ca ca "livemirror test CA"
ca rogue-ca "someone else's CA"

printf 'organization = livemirror tests\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 3650\n' >server.info
printf 'organization = livemirror tests\ncn = client\ntls_www_client\nsigning_key\nencryption_key\nexpiration_days = 3650\n' >client.info

cp ca/ca-cert.pem server/ && signed ca server/server-key.pem server/server-cert.pem server.info
cp ca/ca-cert.pem client/ && signed ca client/client-key.pem client/client-cert.pem client.info
cp ca/ca-cert.pem anon/
# The rogue client trusts our CA (so it accepts the server) and the other one
# (so gnutls accepts its own certificate), which signed its certificate.
signed rogue-ca rogue/client-key.pem rogue/client-cert.pem client.info
cat ca/ca-cert.pem rogue-ca/ca-cert.pem >rogue/ca-cert.pem
cp rogue-ca/ca-cert.pem distrust/

psktool -u alice -p psk/keys.psk >/dev/null
psktool -u alice -p psk-wrong/keys.psk >/dev/null
psktool -u bob -p psk-bob/keys.psk >/dev/null
chmod -R go-rwx "$dir"
