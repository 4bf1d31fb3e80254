// Package k8s is the Kubernetes end-to-end test (make k8s-e2e): a
// one-node cluster from Kubernetes' own code on a private containerd,
// snapview installed the way an operator does (kubectl apply -f deploy/),
// and pods of the snapview RuntimeClass.
package k8s

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// The node's address, on a veth pair inside the test's own network
// namespace: the kubelet refuses a loopback node IP, and nothing may use an
// address in the host's namespace. The cluster's processes all run in that
// namespace; the pods' CNI bridge lives there too.
const (
	nodeIP    = "10.200.0.1"
	nodeName  = "snapview-k8s-node"
	podSubnet = "10.244.0.0/24"
)

// netns is a network namespace of the test's own, bound at Path.
type netns struct{ Name, Path string }

// newNetNS creates the namespace with loopback up and the node's address.
func newNetNS(name string) (*netns, error) {
	n := &netns{Name: name, Path: "/run/netns/" + name}
	steps := [][]string{
		{"netns", "add", name},
		{"-n", name, "link", "set", "lo", "up"},
		{"-n", name, "link", "add", "node0", "type", "veth", "peer", "name", "node0-peer"},
		{"-n", name, "addr", "add", nodeIP + "/24", "dev", "node0"},
		{"-n", name, "link", "set", "node0", "up"},
		{"-n", name, "link", "set", "node0-peer", "up"},
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			n.remove()
			return nil, fmt.Errorf("ip %s: %w: %s", strings.Join(s, " "), err, out)
		}
	}
	return n, nil
}

func (n *netns) remove() { _ = exec.Command("ip", "netns", "del", n.Name).Run() }

// command runs argv inside the namespace (nsenter changes only the
// network namespace).
func (n *netns) command(argv ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + n.Path, "--"}, argv...)...)
}

// pki is the cluster's certificate authority and the files it issued.
type pki struct {
	dir    string
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
}

func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	cert, der, key, err := harness.NewCA("snapview-k8s-ca")
	if err != nil {
		return nil, err
	}
	p := &pki{dir: dir, caCert: cert, caKey: key}
	return p, p.write("ca", der, key)
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

func (p *pki) write(name string, der []byte, key *ecdsa.PrivateKey) error {
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(p.path(name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(p.path(name+".key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
}

// issue writes <name>.crt and <name>.key: a client certificate for user cn
// in groups, or a serving one for ips and dns names.
func (p *pki) issue(name, cn string, groups []string, ips []string, dns []string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: groups},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		DNSNames:     dns,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		return err
	}
	return p.write(name, der, key)
}

// kubeconfig writes <name>.kubeconfig for the certificate <name>.
func (p *pki) kubeconfig(name, server string) (string, error) {
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: snapview-k8s
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: snapview-k8s
  context: {cluster: snapview-k8s, user: %s}
current-context: snapview-k8s
`, server, p.path("ca.crt"), name, p.path(name+".crt"), p.path(name+".key"), name)
	path := p.path(name + ".kubeconfig")
	return path, os.WriteFile(path, []byte(cfg), 0o600)
}

// process is one of the cluster's components, its output in a log file.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// start runs argv in the namespace, logging to <dir>/<name>.log.
func start(n *netns, dir, name string, argv ...string) (*process, error) {
	logPath := filepath.Join(dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := n.command(argv...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); f.Close(); close(p.done) }()
	return p, nil
}

// stop ends the process with SIGTERM, SIGKILL after 15 s.
func (p *process) stop() {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// tail returns the end of the process's log.
func (p *process) tail(n int) string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitFor polls cond every 500 ms until it holds or timeout passes, and
// returns the last error cond gave.
func waitFor(ctx context.Context, timeout time.Duration, cond func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if last = cond(); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("after %s: %w", timeout, last)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// kubectl runs kubectl against the cluster inside the namespace.
type kubectl struct {
	n          *netns
	bin        string
	kubeconfig string
}

func (k *kubectl) run(stdin []byte, args ...string) (string, error) {
	cmd := k.n.command(append([]string{k.bin, "--kubeconfig", k.kubeconfig}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %w: %s%s", strings.Join(args, " "), err, errb.String(), out.String())
	}
	return out.String(), nil
}
