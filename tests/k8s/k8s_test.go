package k8s

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

const (
	k8sNamespace = "k8s.io"
	pauseImage   = "docker.io/snapview/pause:latest"
	appImage     = "docker.io/library/busybox:1.36" // the example pod's
	installImage = "ghcr.io/snapview/snapview-install:latest"
)

// cluster is the running one-node cluster.
type cluster struct {
	t     *testing.T
	dir   string
	ns    *netns
	d     *harness.Daemon
	k     *kubectl
	procs []*process
	// node is where snapviewctl installs: the private containerd's files,
	// as a node's /usr/local and /etc/containerd would be.
	node string
	// stopSupervise ends the test's role as the node's service manager.
	stopSupervise func()
}

// TestKubernetes installs snapview on a one-node cluster the way
// docs/kubernetes.md tells an operator to (kubectl apply -f deploy/: the
// installer DaemonSet, the RuntimeClass, the example pod), then runs pods
// of the snapview RuntimeClass through the kubelet: exec and logs, a
// crashing container's restarts, a block-mode pod of a handler of its own,
// a runc pod beside them from before the install; then deletes them,
// uninstalls through the documented Job, and checks that nothing is left.
func TestKubernetes(t *testing.T) {
	c := startCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	// A pod of the default (runc) handler, from before the install: it
	// must keep running through containerd's restart, and behave the same.
	c.apply(t, runcPod("before"))
	c.waitRunning(ctx, t, "runc-before")

	mainBefore, err := os.ReadFile(filepath.Join(c.d.Dir, "config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	// Install: kubectl apply -f deploy/, with the DaemonSet's flags pointing
	// at this node's layout.
	deploy := c.deployDir(t)
	if _, err := c.k.run(nil, "label", "node", nodeName, "snapview.io/runtime=true"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.k.run(nil, "apply", "-f", deploy); err != nil {
		t.Fatal(err)
	}
	if _, err := c.k.run(nil, "-n", "kube-system", "rollout", "status", "ds/snapview-install", "--timeout=5m"); err != nil {
		t.Fatal(err)
	}
	c.waitLog(ctx, t, "kube-system", "ds/snapview-install", "containerd restarted")
	if err := waitFor(ctx, time.Minute, func() error {
		hs, err := c.handlers(ctx)
		if err == nil && (!hs["snapview"] || !hs["snapview-layered"]) {
			err = fmt.Errorf("containerd serves the handlers %v", hs)
		}
		return err
	}); err != nil {
		t.Fatalf("after the DaemonSet's install: %v", err)
	}

	// The example pod of deploy/: its boot artifact and the whole image.
	c.waitRunning(ctx, t, "snapview-example")
	logs := c.waitLog(ctx, t, "default", "snapview-example", `"version"`)
	if !strings.Contains(logs, "passwd") {
		t.Errorf("kubectl logs snapview-example does not list the bound artifact:\n%s", logs)
	}
	passwd, err := c.k.run(nil, "exec", "snapview-example", "--", "cat", "/.snapview/boot/passwd")
	if err != nil || !strings.HasPrefix(passwd, "root:x:0:0:") {
		t.Errorf("kubectl exec cat /.snapview/boot/passwd: %q %v", passwd, err)
	}
	if out, err := c.k.run(nil, "exec", "snapview-example", "--", "sh", "-c", "test -f /image/boot/vmlinux && touch /image/x"); err == nil || !strings.Contains(out+err.Error(), "Read-only file system") {
		t.Errorf("the view at /image is not read-only: %q %v", out, err)
	}
	c.checkOneLeasePerLiveContainer(ctx, t)

	// The runc pod from before kept running through the restart, sees
	// nothing of snapview, and a new runc pod behaves the same.
	c.apply(t, runcPod("after"))
	for _, p := range []string{"runc-before", "runc-after"} {
		c.waitRunning(ctx, t, p)
		out, err := c.k.run(nil, "exec", p, "--", "sh", "-c", "ls /.snapview 2>&1; cat /proc/1/cmdline")
		if err != nil || !strings.Contains(out, "No such file") || !strings.Contains(out, "sleep") {
			t.Errorf("runc pod %s: %q %v", p, out, err)
		}
	}

	// A container that exits non-zero: the kubelet restarts it, and each
	// run gets a view of its own, none left by the runs before.
	c.apply(t, crashingPod)
	if err := waitFor(ctx, 4*time.Minute, func() error {
		n, err := c.restarts("snapview-crashing")
		if err == nil && n < 2 {
			err = fmt.Errorf("restarted %d times", n)
		}
		return err
	}); err != nil {
		t.Fatalf("snapview-crashing: %v", err)
	}
	if out, _ := c.k.run(nil, "logs", "snapview-crashing", "--previous"); !strings.Contains(out, "root:x:0:0:") {
		t.Errorf("the crashed run's log lacks its bound artifact:\n%s", out)
	}
	c.checkOneLeasePerLiveContainer(ctx, t)

	// Block mode on a handler of its own (snapview on erofs in block mode,
	// installed by the DaemonSet with --snapshotter erofs).
	c.apply(t, layeredRuntimeClass+"---\n"+blockPod)
	c.waitRunning(ctx, t, "snapview-block")
	c.waitLog(ctx, t, "default", "snapview-block", "ready")
	out, err := c.k.run(nil, "exec", "snapview-block", "--", "sh", "-c", "ls /dev/snapview/layers; dd if=/dev/snapview/layers/0 of=/dev/null bs=4k count=1 2>&1; echo x | dd of=/dev/snapview/layers/0 2>&1; true")
	// The write is refused: by the device's cgroup rule (r) before the
	// read-only loop device would refuse it.
	if !strings.Contains(out, "0\n") || !strings.Contains(out, "1+0 records in") ||
		(!strings.Contains(out, "Operation not permitted") && !strings.Contains(strings.ToLower(out), "read-only")) {
		t.Errorf("kubectl exec in the block pod: %q %v", out, err)
	}
	c.checkOneLeasePerLiveContainer(ctx, t)

	// Snapshots, as an operator takes them on a node: kubectl exec into
	// the DaemonSet's pod, whose image carries snapviewctl, and run it in
	// the host's mount namespace (the pod has the host's PIDs), at the
	// installed binary.
	snaps := c.snapshots(ctx, t)

	// Delete the pods (their grace periods included), then uninstall the
	// way docs/kubernetes.md says: the RuntimeClass and the DaemonSet
	// first, then the uninstall Job on the node.
	if _, err := c.k.run(nil, "delete", "pod", "snapview-example", "snapview-crashing", "snapview-block", "runc-before", "runc-after",
		"snapview-restored", "snapview-dir-volume", "--wait=true", "--timeout=3m"); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctx, 2*time.Minute, func() error { return c.snapviewLeaks(ctx) }); err != nil {
		t.Errorf("after deleting the pods: %v", err)
	}
	// The snapshots outlived the pods; snapshot rm removes them.
	c.removeSnapshots(ctx, t, snaps)
	if _, err := c.k.run(nil, "delete", "-f", filepath.Join(deploy, "10-runtimeclass.yaml"), "-f", filepath.Join(deploy, "20-daemonset.yaml"), "-f", filepath.Join(deploy, "layered.yaml"), "--wait=true", "--timeout=3m"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.k.run(nil, "apply", "-f", filepath.Join(deploy, "uninstall")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.k.run(nil, "-n", "kube-system", "wait", "--for=condition=complete", "job/snapview-uninstall", "--timeout=5m"); err != nil {
		out, _ := c.k.run(nil, "-n", "kube-system", "logs", "job/snapview-uninstall")
		t.Fatalf("%v\n%s", err, out)
	}
	// The Job's pod may run twice: containerd's restart can cost it its
	// first run's exit status, and the second finds nothing to change. What
	// counts is the effect: containerd restarted without the handlers.
	if out, _ := c.k.run(nil, "-n", "kube-system", "get", "pods", "-l", "app.kubernetes.io/name=snapview-uninstall", "-o", "jsonpath={.items[*].status.containerStatuses[*].restartCount}"); out != "0" {
		t.Logf("the uninstall Job's pod restarted %s times", out)
	}
	if err := waitFor(ctx, time.Minute, func() error {
		hs, err := c.handlers(ctx)
		if err == nil && (hs["snapview"] || hs["snapview-layered"]) {
			err = fmt.Errorf("containerd still serves the handlers: %v", hs)
		}
		return err
	}); err != nil {
		t.Errorf("after uninstall: %v", err)
	}
	if mainAfter, _ := os.ReadFile(filepath.Join(c.d.Dir, "config.toml")); string(mainAfter) != string(mainBefore) {
		t.Errorf("containerd's main configuration after uninstall:\n%s\nbefore install:\n%s", mainAfter, mainBefore)
	}
	for _, p := range []string{"etc/containerd/conf.d/snapview.toml", "etc/containerd/conf.d/snapview-layered.toml", "usr/local/bin/containerd-shim-snapview-v2", "usr/local/bin/snapviewctl"} {
		if _, err := os.Stat(filepath.Join(c.node, p)); err == nil {
			t.Errorf("%s left after uninstall", p)
		}
	}
	if _, err := c.k.run(nil, "-n", "kube-system", "delete", "job/snapview-uninstall", "--wait=true"); err != nil {
		t.Error(err)
	}
	if err := waitFor(ctx, 2*time.Minute, func() error { return c.snapviewLeaks(ctx) }); err != nil {
		t.Errorf("after uninstalling: %v", err)
	}

	// The node drained: the kubelet stopped and the sandboxes it had not
	// collected yet removed through CRI, nothing may be left at all
	// (containers, shims, activations, mounts, loop devices).
	c.stopKubelet()
	if err := c.removePods(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.d.CheckLeaks(ctx); err != nil {
		t.Error(err)
	}
}

// startCluster builds the cluster: a network namespace, the private
// containerd in it with only runc's handler (as a node's is before
// snapview), etcd, the API server, the controller manager, the scheduler
// and the kubelet, from the binaries hack/install-k8s.sh built.
func startCluster(t *testing.T) *cluster {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root: a kubelet, a containerd, mounts")
	}
	bin, cni := os.Getenv("SNAPVIEW_K8S"), os.Getenv("SNAPVIEW_CNI")
	if bin == "" || cni == "" {
		t.Skip("SNAPVIEW_K8S and SNAPVIEW_CNI name the Kubernetes and CNI binaries: run make k8s-e2e")
	}
	tools, err := harness.ToolsFromEnv(false)
	if err != nil {
		t.Fatal(err)
	}
	ctl := os.Getenv("SNAPVIEW_CTL")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Not t.TempDir: teardown unmounts what the kubelet left first, and
	// SNAPVIEW_K8S_KEEP keeps a failed run's logs.
	dir, err := os.MkdirTemp("", "snapview-k8s-") //nolint:usetesting // see above
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, dir: dir}
	t.Cleanup(func() { c.teardown() })

	if c.ns, err = newNetNS(fmt.Sprintf("snapview-k8s-%d", os.Getpid())); err != nil {
		t.Fatal(err)
	}
	imgs, err := buildImages(dir, tools.Shim, ctl)
	if err != nil {
		t.Fatal(err)
	}
	c.d, err = harness.StartDaemon(ctx, dir, tools,
		harness.WithCRI(harness.CRIConfig{SandboxImage: pauseImage, Bare: true}),
		harness.WithNetNS(c.ns.Path), harness.WithErofsBlock("64M"), harness.WithLogLevel("info"))
	if err != nil {
		t.Fatal(err)
	}
	c.d.Snapshotters = []string{"overlayfs", "erofs"}
	c.stopSupervise = c.d.Supervise(context.Background(), t.Logf)
	for _, img := range imgs {
		if _, err := c.d.Import(ctx, k8sNamespace, img, "overlayfs", "erofs"); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.setUpNode(cni); err != nil {
		t.Fatal(err)
	}

	p, err := newPKI(filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	server := "https://127.0.0.1:6443"
	for _, id := range []struct{ name, cn, group string }{
		{"admin", "snapview-k8s-admin", "system:masters"},
		{"kubelet", "system:node:" + nodeName, "system:nodes"},
		{"scheduler", "system:kube-scheduler", ""},
		{"controller-manager", "system:kube-controller-manager", ""},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"},
	} {
		var groups []string
		if id.group != "" {
			groups = []string{id.group}
		}
		if err := p.issue(id.name, id.cn, groups, nil, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := p.kubeconfig(id.name, server); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.issue("apiserver", "kube-apiserver", nil, []string{"127.0.0.1", nodeIP, "10.96.0.1"}, []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}); err != nil {
		t.Fatal(err)
	}
	if err := p.issue("kubelet-serving", nodeName, nil, []string{nodeIP, "127.0.0.1"}, []string{nodeName}); err != nil {
		t.Fatal(err)
	}
	if err := p.issue("service-accounts", "service-accounts", nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	c.k = &kubectl{n: c.ns, bin: filepath.Join(bin, "kubectl"), kubeconfig: p.path("admin.kubeconfig")}

	c.run(t, "etcd", filepath.Join(bin, "etcd"), "-data-dir", filepath.Join(dir, "etcd"))
	c.run(t, "kube-apiserver", filepath.Join(bin, "kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--advertise-address="+nodeIP, "--secure-port=6443",
		"--cert-dir="+filepath.Join(dir, "apiserver"),
		"--client-ca-file="+p.path("ca.crt"),
		"--tls-cert-file="+p.path("apiserver.crt"), "--tls-private-key-file="+p.path("apiserver.key"),
		"--kubelet-client-certificate="+p.path("apiserver-kubelet-client.crt"), "--kubelet-client-key="+p.path("apiserver-kubelet-client.key"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+p.path("service-accounts.key"),
		"--service-account-signing-key-file="+p.path("service-accounts.key"),
		"--service-cluster-ip-range=10.96.0.0/24",
		"--kubelet-preferred-address-types=InternalIP",
		"--authorization-mode=Node,RBAC", "--allow-privileged=true", "--profiling=false")
	if err := waitFor(ctx, 2*time.Minute, func() error {
		_, err := c.k.run(nil, "get", "--raw", "/readyz")
		return c.alive(err)
	}); err != nil {
		t.Fatalf("the API server is not ready: %v\n%s", err, c.procs[len(c.procs)-1].tail(20))
	}
	c.run(t, "kube-controller-manager", filepath.Join(bin, "kube-controller-manager"),
		"--kubeconfig="+p.path("controller-manager.kubeconfig"),
		"--authentication-kubeconfig="+p.path("controller-manager.kubeconfig"),
		"--authorization-kubeconfig="+p.path("controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1", "--leader-elect=false",
		"--service-account-private-key-file="+p.path("service-accounts.key"),
		"--root-ca-file="+p.path("ca.crt"), "--use-service-account-credentials=true")
	c.run(t, "kube-scheduler", filepath.Join(bin, "kube-scheduler"),
		"--kubeconfig="+p.path("scheduler.kubeconfig"),
		"--authentication-kubeconfig="+p.path("scheduler.kubeconfig"),
		"--authorization-kubeconfig="+p.path("scheduler.kubeconfig"),
		"--bind-address=127.0.0.1", "--leader-elect=false")

	kubeletCfg := filepath.Join(dir, "kubelet.yaml")
	if err := os.WriteFile(kubeletCfg, []byte(kubeletConfig(p, c.d.Address, dir)), 0o600); err != nil {
		t.Fatal(err)
	}
	c.run(t, "kubelet", filepath.Join(bin, "kubelet"),
		"--config="+kubeletCfg, "--kubeconfig="+p.path("kubelet.kubeconfig"),
		"--root-dir="+filepath.Join(dir, "kubelet"), "--hostname-override="+nodeName,
		"--node-ip="+nodeIP, "--v=2")
	if err := waitFor(ctx, 3*time.Minute, func() error {
		out, err := c.k.run(nil, "get", "node", nodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err == nil && out != "True" {
			err = fmt.Errorf("node %s Ready=%q", nodeName, out)
		}
		return c.alive(err)
	}); err != nil {
		t.Fatalf("the node is not ready: %v\n%s", err, c.procs[len(c.procs)-1].tail(30))
	}
	// Pods need their namespace's service account.
	if err := waitFor(ctx, time.Minute, func() error {
		_, err := c.k.run(nil, "get", "serviceaccount", "default")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

// alive adds to err which of the cluster's processes has exited.
func (c *cluster) alive(err error) error {
	for _, p := range c.procs {
		if p.exited() {
			return fmt.Errorf("%s exited:\n%s", p.name, p.tail(15))
		}
	}
	return err
}

func (c *cluster) run(t *testing.T, name string, argv ...string) {
	t.Helper()
	p, err := start(c.ns, c.dir, name, argv...)
	if err != nil {
		t.Fatal(err)
	}
	c.procs = append(c.procs, p)
}

// setUpNode lays out what a node has before snapview: the CNI plugins and
// a bridge network inside the test's namespace, and containerd's main
// configuration where snapviewctl install looks for it.
func (c *cluster) setUpNode(cni string) error {
	bins := filepath.Join(c.d.Dir, "cni", "bin")
	if err := os.MkdirAll(bins, 0o755); err != nil {
		return err
	}
	for _, b := range []string{"bridge", "host-local", "loopback"} {
		data, err := os.ReadFile(filepath.Join(cni, b))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(bins, b), data, 0o755); err != nil {
			return err
		}
	}
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "snapview-k8s", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "dataDir": %q}}]}
`, podSubnet, filepath.Join(c.d.Dir, "cni", "ipam"))
	if err := os.MkdirAll(filepath.Join(c.d.Dir, "cni", "net.d"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.d.Dir, "cni", "net.d", "10-snapview-k8s.conflist"), []byte(conf), 0o644); err != nil {
		return err
	}
	// The node's root for the installer: containerd's configuration at
	// <node>/etc/containerd/config.toml is the daemon's own file.
	c.node = filepath.Join(c.dir, "node")
	if err := os.MkdirAll(filepath.Join(c.node, "etc", "containerd"), 0o755); err != nil {
		return err
	}
	return nil
}

// kubeletConfig is the kubelet's configuration for this node: cgroup v1
// accepted (this machine has no v2), no swap check, eviction and image GC
// thresholds out of the way of a test machine's disk, the private
// containerd's CRI socket, everything under the test's directory.
func kubeletConfig(p *pki, sock, dir string) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://%s
podLogsDir: %s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: %s
tlsPrivateKeyFile: %s
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %s}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 20
`, sock, filepath.Join(dir, "pod-logs"), p.path("kubelet-serving.crt"), p.path("kubelet-serving.key"), p.path("ca.crt"))
}

// buildImages builds the pause image, the example pod's image and the
// installer image (deploy/Containerfile's content: busybox with the shim
// and snapviewctl in /usr/local/bin), as OCI archives: there is no
// registry.
func buildImages(dir, shim, ctl string) ([]*harness.Image, error) {
	pause, err := harness.BuildImage(dir, harness.ImageSpec{Ref: pauseImage, KernelSize: 1 << 10, Cmd: []string{"sleep", "86400"}})
	if err != nil {
		return nil, err
	}
	app, err := harness.BuildImage(dir, harness.ImageSpec{Ref: appImage, KernelSize: 1 << 20})
	if err != nil {
		return nil, err
	}
	base, err := harness.BusyboxLayer([]string{"sh", "sleep", "chroot", "nsenter", "cat", "ls", "kill", "test", "echo"})
	if err != nil {
		return nil, err
	}
	bins := harness.NewLayer().Dir("usr", 0o755).Dir("usr/local", 0o755).Dir("usr/local/bin", 0o755)
	for name, src := range map[string]string{"containerd-shim-snapview-v2": shim, "snapviewctl": ctl} {
		if err := bins.HostFile("usr/local/bin/"+name, src); err != nil {
			return nil, err
		}
	}
	oci, err := harness.Compose(installImage, ocispec.ImageConfig{
		Env: []string{"PATH=/usr/local/bin:/bin"}, Entrypoint: []string{"/usr/local/bin/snapviewctl"},
	}, base, bins)
	if err != nil {
		return nil, err
	}
	archive, err := oci.WriteArchiveFile(dir)
	if err != nil {
		return nil, err
	}
	return []*harness.Image{pause, app, {Ref: installImage, Archive: archive, Files: oci.Files}}, nil
}

// nodeFlags point snapviewctl at this node's layout: the private
// containerd's configuration and a prefix of the test's own, instead of
// /etc/containerd and /usr/local; and its restart: this node's service
// manager is the test, which starts containerd again when it exits.
func (c *cluster) nodeFlags() string {
	cfg := filepath.Join(c.d.Dir, "config.toml")
	return fmt.Sprintf("--prefix %s --config %s --restart-command 'kill -TERM $(cat %s)'",
		filepath.Join(c.node, "usr/local"), cfg, c.d.PidFile())
}

// deployDir copies deploy/ into the test's directory with the edits an
// operator makes for this node: the installer's flags.
func (c *cluster) deployDir(t *testing.T) string {
	t.Helper()
	src := filepath.Join("..", "..", "deploy")
	dst := filepath.Join(c.dir, "deploy")
	// The node's containerd configuration lives in the daemon's directory;
	// the drop-ins and snapview.toml go under <node>/etc/containerd.
	etc := filepath.Join(c.node, "etc/containerd")
	flags := func(handler string) string {
		return fmt.Sprintf("%s --dropin %s/conf.d/%s.toml --snapview-config %s/%s.toml", c.nodeFlags(), etc, handler, etc, handler)
	}
	var copied int
	err := filepath.WalkDir(src, func(path string, e os.DirEntry, err error) error {
		if err != nil || e.IsDir() || filepath.Ext(path) != ".yaml" {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		s := string(data)
		// The DaemonSet installs a second handler on erofs for block mode,
		// then the default one with the restart; the Job uninstalls both.
		verb := map[string]string{"20-daemonset.yaml": "install", "uninstall/job.yaml": "uninstall"}[rel]
		if verb != "" {
			old := "/usr/local/bin/snapviewctl " + verb + " --root /host --restart"
			if !strings.Contains(s, old) {
				return fmt.Errorf("%s: no %q to point at this node", rel, old)
			}
			layered := "--handler snapview-layered "
			if verb == "install" {
				layered += "--snapshotter erofs "
			}
			s = strings.Replace(s, old, "/usr/local/bin/snapviewctl "+verb+" --root /host "+layered+flags("snapview-layered")+
				" && /usr/local/bin/snapviewctl "+verb+" --root /host --restart "+flags("snapview"), 1)
		}
		copied++
		out := filepath.Join(dst, rel)
		if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
			return err
		}
		return os.WriteFile(out, []byte(s), 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dst, "layered.yaml"), []byte(layeredRuntimeClass), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("deploy/: %d manifests, pointed at this node", copied)
	return dst
}

func (c *cluster) apply(t *testing.T, manifest string) {
	t.Helper()
	if _, err := c.k.run([]byte(manifest), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
}

func (c *cluster) waitRunning(ctx context.Context, t *testing.T, pod string) {
	t.Helper()
	if err := waitFor(ctx, 4*time.Minute, func() error {
		out, err := c.k.run(nil, "get", "pod", pod, "-o", "jsonpath={.status.phase}")
		if err == nil && out != "Running" {
			err = fmt.Errorf("pod %s is %q", pod, out)
		}
		return err
	}); err != nil {
		desc, _ := c.k.run(nil, "describe", "pod", pod)
		t.Fatalf("%v\n%s", err, desc)
	}
}

// waitLog waits until kubectl logs of what (a pod, or ds/...) in namespace
// ns shows want, and returns the log.
func (c *cluster) waitLog(ctx context.Context, t *testing.T, ns, what, want string) string {
	t.Helper()
	var out string
	if err := waitFor(ctx, 2*time.Minute, func() error {
		var err error
		out, err = c.k.run(nil, "-n", ns, "logs", what)
		if err == nil && !strings.Contains(out, want) {
			err = fmt.Errorf("no %q yet", want)
		}
		return err
	}); err != nil {
		t.Fatalf("kubectl -n %s logs %s: %v\n%s", ns, what, err, out)
	}
	return out
}

func (c *cluster) restarts(pod string) (int, error) {
	out, err := c.k.run(nil, "get", "pod", pod, "-o", "jsonpath={.status.containerStatuses[0].restartCount}")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(out))
}

// checkOneLeasePerLiveContainer: every snapview lease in CRI's namespace
// belongs to a container whose task is running (a lease is keyed by its
// container's id, so none has two); a restarted container's earlier runs
// hold none.
func (c *cluster) checkOneLeasePerLiveContainer(ctx context.Context, t *testing.T) {
	t.Helper()
	if err := waitFor(ctx, time.Minute, func() error { return c.leaseCheck(ctx) }); err != nil {
		t.Error(err)
	}
}

func (c *cluster) leaseCheck(ctx context.Context) error {
	nctx := harness.Context(ctx, k8sNamespace)
	ls, err := c.d.Client().LeasesService().List(nctx, fmt.Sprintf("labels.%q", harness.LeaseLabel))
	if err != nil {
		return err
	}
	for _, l := range ls {
		id := l.Labels[harness.LeaseLabel]
		if !c.running(nctx, id) {
			return fmt.Errorf("lease %s of container %s, whose task is not running", l.ID, id)
		}
	}
	return nil
}

func (c *cluster) running(ctx context.Context, id string) bool {
	ctr, err := c.d.Client().LoadContainer(ctx, id)
	if err != nil {
		return false
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		return false
	}
	st, err := task.Status(ctx)
	return err == nil && st.Status == "running"
}

// snapviewLeaks reports snapview's leases, views, view mounts and loop
// devices left on the node (containers the kubelet has not collected yet,
// and their shims, aside).
func (c *cluster) snapviewLeaks(ctx context.Context) error {
	if leaks := c.d.ViewLeaks(ctx, k8sNamespace); len(leaks) > 0 {
		return fmt.Errorf("left: %s", strings.Join(leaks, ", "))
	}
	return nil
}
