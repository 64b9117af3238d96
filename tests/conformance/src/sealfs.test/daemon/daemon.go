// Package daemon starts containerd-sealfs-grpc for containerd's snapshotter conformance
// suites (conformance: containerd 1.6's, conformance2: containerd 2.x's).
package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"google.golang.org/grpc"
)

// Start starts the daemon named by $SEALFS_DAEMON with its root at root, and returns a gRPC
// connection to its socket, dialled as containerd dials a proxy plugin, and a stop function.
func Start(ctx context.Context, root string) (*grpc.ClientConn, func() error, error) {
	binary := os.Getenv("SEALFS_DAEMON")
	if binary == "" {
		return nil, nil, fmt.Errorf("SEALFS_DAEMON must name the containerd-sealfs-grpc binary")
	}
	socket := filepath.Join(root, "run", "sealfs.sock")
	keys := filepath.Join(filepath.Dir(root), "keys")
	if err := os.MkdirAll(keys, 0700); err != nil {
		return nil, nil, err
	}
	config := filepath.Join(filepath.Dir(root), "sealfs.toml")
	text := fmt.Sprintf("root = %q\nsocket = %q\nkeys_dir = %q\nmetrics_address = \"\"\nlog_level = \"debug\"\n",
		root, socket, keys)
	if err := os.WriteFile(config, []byte(text), 0600); err != nil {
		return nil, nil, err
	}
	log, err := os.Create(filepath.Join(filepath.Dir(root), "sealfs.log"))
	if err != nil {
		return nil, nil, err
	}
	daemon := exec.Command(binary, "--config", config)
	daemon.Stderr = log
	daemon.Stdout = log
	if err := daemon.Start(); err != nil {
		return nil, nil, err
	}
	stop := func() error {
		_ = daemon.Process.Signal(syscall.SIGTERM)
		_, err := daemon.Process.Wait()
		log.Close()
		return err
	}
	// The socket answers once the daemon serves; bounded, so a daemon that fails to start
	// fails the case instead of hanging it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.Dial("unix", socket)
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			stop()
			logText, _ := os.ReadFile(log.Name())
			return nil, nil, fmt.Errorf("containerd-sealfs-grpc did not serve %s: %s", socket, logText)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// As containerd dials a proxy plugin: the socket, with ":authority" localhost (a path
	// is no valid HTTP/2 authority), insecure because only root reaches the socket (the
	// grpc Debian 12 packages predates credentials/insecure).
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}
	conn, err := grpc.Dial("localhost", grpc.WithInsecure(), grpc.WithContextDialer(dialer))
	if err != nil {
		stop()
		return nil, nil, err
	}
	return conn, func() error {
		conn.Close()
		return stop()
	}, nil
}
