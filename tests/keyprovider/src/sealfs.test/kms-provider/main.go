// Command kms-provider is the tests' stand-in for a KMS: a keyprovider speaking ocicrypt's
// protocol with ocicrypt's own message types, over `cmd` (one request on stdin, the answer on
// stdout) or gRPC (ocicrypt's KeyProviderService). It holds its own AES-256-GCM wrapping key
// in a file, as a KMS holds its key encryption key; nothing it wraps opens without it.
//
// Faults for the tests: -delay makes every answer late (a slow KMS); while the file named by
// -refuse-while exists, every request is refused (a KMS denying the node). -log appends one
// line per request (the operation and the provider parameters it was given), so a test can
// see which path asked.
package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/containers/ocicrypt/keywrap/keyprovider"
	keyproviderpb "github.com/containers/ocicrypt/utils/keyprovider"
	"google.golang.org/grpc"
)

var (
	keyFile     = flag.String("key", "", "file holding the 32-byte wrapping key")
	grpcAddress = flag.String("grpc", "", "serve gRPC on this address (HOST:PORT or unix:///PATH) instead of one cmd request")
	delay       = flag.Duration("delay", 0, "answer this late")
	refuseWhile = flag.String("refuse-while", "", "refuse every request while this file exists")
	logFile     = flag.String("log", "", "append one line per request to this file")
)

// wrapped is the annotation this provider answers to keywrap: what a KMS's ciphertext blob is.
type wrapped struct {
	KeyID      string `json:"kid"`
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ct"`
}

const keyID = "sealfs-test-kms/1"

func wrappingKey() (cipher.AEAD, error) {
	// The test makes the key before any provider runs: several run at once (sealctl wraps
	// layers in parallel), and one making it while another reads it would leave layers
	// wrapped under a key that is then replaced.
	key, err := os.ReadFile(*keyFile)
	if err != nil {
		return nil, err
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("%s holds %d bytes, not 32", *keyFile, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

func logRequest(input *keyprovider.KeyProviderKeyWrapProtocolInput, via string) {
	if *logFile == "" {
		return
	}
	var names []string
	if ec := input.KeyWrapParams.Ec; ec != nil {
		for name, values := range ec.Parameters {
			for _, value := range values {
				names = append(names, name+"="+string(value))
			}
		}
	}
	if dc := input.KeyUnwrapParams.Dc; dc != nil {
		for name, values := range dc.Parameters {
			for _, value := range values {
				names = append(names, name+"="+string(value))
			}
		}
	}
	sort.Strings(names)
	f, err := os.OpenFile(*logFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s %s %s\n", via, input.Operation, strings.Join(names, ","))
}

// answer handles one protocol request (JSON in, JSON out).
func answer(request []byte, via string) ([]byte, error) {
	if *delay > 0 {
		time.Sleep(*delay)
	}
	var input keyprovider.KeyProviderKeyWrapProtocolInput
	if err := json.Unmarshal(request, &input); err != nil {
		return nil, fmt.Errorf("request is not the keyprovider protocol: %w", err)
	}
	logRequest(&input, via)
	if *refuseWhile != "" {
		if _, err := os.Stat(*refuseWhile); err == nil {
			return nil, errors.New("access denied by policy: this node may not use key " + keyID)
		}
	}
	aead, err := wrappingKey()
	if err != nil {
		return nil, err
	}
	var output keyprovider.KeyProviderKeyWrapProtocolOutput
	switch input.Operation {
	case keyprovider.OpKeyWrap:
		if input.KeyWrapParams.Ec == nil || len(input.KeyWrapParams.OptsData) == 0 {
			return nil, errors.New("keywrap without encrypt config or data")
		}
		nonce := make([]byte, aead.NonceSize())
		if _, err := rand.Read(nonce); err != nil {
			return nil, err
		}
		blob := wrapped{KeyID: keyID, Nonce: nonce, Ciphertext: aead.Seal(nil, nonce, input.KeyWrapParams.OptsData, []byte(keyID))}
		output.KeyWrapResults.Annotation, err = json.Marshal(blob)
		if err != nil {
			return nil, err
		}
	case keyprovider.OpKeyUnwrap:
		var blob wrapped
		if err := json.Unmarshal(input.KeyUnwrapParams.Annotation, &blob); err != nil || blob.KeyID != keyID {
			return nil, errors.New("annotation was not wrapped by this KMS")
		}
		plain, err := aead.Open(nil, blob.Nonce, blob.Ciphertext, []byte(keyID))
		if err != nil {
			return nil, errors.New("annotation does not decrypt under this KMS's key")
		}
		output.KeyUnwrapResults.OptsData = plain
	default:
		return nil, fmt.Errorf("unknown operation %q", input.Operation)
	}
	return json.Marshal(output)
}

type server struct{}

func (server) WrapKey(_ context.Context, in *keyproviderpb.KeyProviderKeyWrapProtocolInput) (*keyproviderpb.KeyProviderKeyWrapProtocolOutput, error) {
	out, err := answer(in.KeyProviderKeyWrapProtocolInput, "grpc")
	if err != nil {
		return nil, err
	}
	return &keyproviderpb.KeyProviderKeyWrapProtocolOutput{KeyProviderKeyWrapProtocolOutput: out}, nil
}

func (server) UnWrapKey(ctx context.Context, in *keyproviderpb.KeyProviderKeyWrapProtocolInput) (*keyproviderpb.KeyProviderKeyWrapProtocolOutput, error) {
	return server{}.WrapKey(ctx, in)
}

func main() {
	flag.Parse()
	if *keyFile == "" {
		fmt.Fprintln(os.Stderr, "kms-provider: -key FILE is required")
		os.Exit(2)
	}
	if *grpcAddress != "" {
		network, address := "tcp", *grpcAddress
		if strings.HasPrefix(address, "unix://") {
			network, address = "unix", strings.TrimPrefix(address, "unix://")
		}
		listener, err := net.Listen(network, address)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kms-provider:", err)
			os.Exit(1)
		}
		// The test waits for this line before it uses the server.
		fmt.Println("serving", listener.Addr())
		s := grpc.NewServer()
		keyproviderpb.RegisterKeyProviderServiceServer(s, server{})
		if err := s.Serve(listener); err != nil {
			fmt.Fprintln(os.Stderr, "kms-provider:", err)
			os.Exit(1)
		}
		return
	}
	request, err := io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	if err == nil {
		var out []byte
		out, err = answer(request, "cmd")
		if err == nil {
			_, err = os.Stdout.Write(out)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kms-provider:", err)
		os.Exit(1)
	}
}
