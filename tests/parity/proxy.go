package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// proxy lets the suite pull its images under their own names
// (ghcr.io/containerd/busybox:1.36 and the like) from the local registry,
// without changing the suite: the suite resolves its image names when its
// package is initialised, before any flag is read. It is an HTTPS proxy on
// loopback (HTTPS_PROXY) that answers CONNECT itself and terminates TLS
// with a certificate for the requested host, signed by a CA made for this
// run and trusted through SSL_CERT_FILE. Nothing of the host's trust store
// or name resolution changes, and nothing leaves the machine.
type proxy struct {
	addr   string
	caFile string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	reg    http.Handler

	mu    sync.Mutex
	certs map[string]*tls.Certificate
	ln    net.Listener
}

func startProxy(reg http.Handler, dir string) (*proxy, error) {
	ca, der, key, err := harness.NewCA("snapview parity test CA")
	if err != nil {
		return nil, err
	}
	caFile := filepath.Join(dir, "parity-ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &proxy{addr: ln.Addr().String(), caFile: caFile, ca: ca, caKey: key, reg: reg, certs: map[string]*tls.Certificate{}, ln: ln}
	go p.serve()
	return p, nil
}

func (p *proxy) close() { _ = p.ln.Close() }

// env returns the environment that sends the suite's pulls here.
func (p *proxy) env() []string {
	return []string{"HTTPS_PROXY=http://" + p.addr, "https_proxy=http://" + p.addr, "NO_PROXY=", "no_proxy=", "SSL_CERT_FILE=" + p.caFile}
}

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.handle(c)
	}
}

// handle answers one CONNECT, then serves the registry over TLS on the
// same connection.
func (p *proxy) handle(c net.Conn) {
	defer c.Close()
	req, err := http.ReadRequest(bufio.NewReader(c))
	if err != nil || req.Method != http.MethodConnect {
		_, _ = c.Write([]byte("HTTP/1.1 405 Method Not Allowed\r\n\r\n"))
		return
	}
	host, _, err := net.SplitHostPort(req.Host)
	if err != nil {
		host = req.Host
	}
	if _, err := c.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n")); err != nil {
		return
	}
	cert, err := p.cert(host)
	if err != nil {
		return
	}
	tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12})
	if err := tc.Handshake(); err != nil {
		return
	}
	srv := &http.Server{Handler: p.reg}
	_ = srv.Serve(&oneConnListener{conn: tc})
}

func (p *proxy) cert(host string) (*tls.Certificate, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.certs[host]; ok {
		return c, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: host},
		DNSNames:     []string{host},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		return nil, err
	}
	c := &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	p.certs[host] = c
	return c, nil
}

// oneConnListener serves a single, already accepted connection.
type oneConnListener struct {
	conn net.Conn
	once sync.Once
	done chan struct{}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	var c net.Conn
	l.once.Do(func() {
		c = l.conn
		l.done = make(chan struct{})
	})
	if c != nil {
		return &closeNotify{Conn: c, done: l.done}, nil
	}
	<-l.done
	return nil, fmt.Errorf("served")
}

func (l *oneConnListener) Close() error   { return nil }
func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }

// closeNotify tells the listener when the connection closed.
type closeNotify struct {
	net.Conn
	done chan struct{}
	once sync.Once
}

func (c *closeNotify) Close() error {
	c.once.Do(func() { close(c.done) })
	return c.Conn.Close()
}
