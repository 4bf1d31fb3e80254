package k8s

import "fmt"

// runcPod is a pod of the default handler (runc), no RuntimeClass.
func runcPod(name string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: runc-%s
spec:
  terminationGracePeriodSeconds: 5
  containers:
    - name: app
      image: docker.io/library/busybox:1.36
      command: ["sleep", "3600"]
`, name)
}

// crashingPod exits non-zero after printing its bound artifact: the
// kubelet restarts it, each run with a view of its own.
const crashingPod = `apiVersion: v1
kind: Pod
metadata:
  name: snapview-crashing
  annotations:
    io.snapview.boot.passwd: /etc/passwd
spec:
  runtimeClassName: snapview
  restartPolicy: Always
  containers:
    - name: app
      image: docker.io/library/busybox:1.36
      command: ["sh", "-c", "cat /.snapview/boot/passwd; sleep 1; exit 3"]
`

// layeredRuntimeClass names the block-mode handler the test's DaemonSet
// installs beside the default one (snapview on erofs in block mode).
const layeredRuntimeClass = `apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: snapview-layered
handler: snapview-layered
scheduling:
  nodeSelector:
    snapview.io/runtime: "true"
`

// blockPod asks for block mode: its image's layers reach it as read-only
// disks and its own upper as a writable one; nothing of it is mounted on
// the host.
const blockPod = `apiVersion: v1
kind: Pod
metadata:
  name: snapview-block
  annotations:
    io.snapview.mode: block
    io.snapview.boot.kernel: /boot/vmlinux
spec:
  runtimeClassName: snapview-layered
  terminationGracePeriodSeconds: 5
  containers:
    - name: monitor
      image: docker.io/library/busybox:1.36
      command: ["sh", "-c", "test -b /dev/snapview/rootfs && test -b /dev/snapview/layers/0 && test -f /.snapview/boot/kernel && echo ready; exec sleep 3600"]
`
