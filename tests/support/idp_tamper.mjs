// Attack mode of the local IdP, for tests only: forge the next ID token the token endpoint
// hands out. Loaded by hub/idp/server.js through IDP_EXTENSION=<this file> (tests/support/idp.py's
// LocalIdP(tamper=True)); it never ships in the wheel.
//
//   POST /__test__/tamper  mode=<one of the modes of forge()>  ->  204; the next token is forged
//                          and the IdP logs "idp: tampered ID token (<mode>)"

export default async function install({ provider, jwks, routes, readForm, load }) {
  const jose = await load('jose');
  let tamper = null;
  let previousIdToken = null;

  async function forge(idToken, mode) {
    const header = jose.decodeProtectedHeader(idToken);
    const claims = jose.decodeJwt(idToken);
    const now = Math.floor(Date.now() / 1000);
    const signingKey = await jose.importJWK(jwks.keys[0], 'RS256');
    const sign = (payload, key = signingKey, kid = header.kid) =>
      new jose.SignJWT(payload).setProtectedHeader({ alg: 'RS256', kid, typ: 'JWT' }).sign(key);
    switch (mode) {
      case 'other_key': {
        const { privateKey } = await jose.generateKeyPair('RS256');
        return sign(claims, privateKey); // same kid as the real key, wrong signature
      }
      case 'unknown_kid': {
        const { privateKey } = await jose.generateKeyPair('RS256');
        return sign(claims, privateKey, 'attacker-key');
      }
      case 'alg_none': {
        const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
        return `${b64({ alg: 'none', typ: 'JWT' })}.${b64(claims)}.`;
      }
      case 'alg_hs256': {
        // Key confusion: HMAC "signed" with the public key's modulus as the secret.
        const secret = new TextEncoder().encode(jwks.keys[0].n);
        return new jose.SignJWT(claims)
          .setProtectedHeader({ alg: 'HS256', kid: header.kid, typ: 'JWT' })
          .sign(secret);
      }
      case 'wrong_iss':
        return sign({ ...claims, iss: 'http://127.0.0.1:9/evil-issuer' });
      case 'wrong_aud':
        return sign({ ...claims, aud: 'another-client', azp: 'another-client' });
      case 'expired':
        return sign({ ...claims, iat: now - 7200, exp: now - 3600 });
      case 'future_iat':
        return sign({ ...claims, iat: now + 3600, exp: now + 7200 });
      case 'no_nonce': {
        const { nonce, ...rest } = claims;
        return sign(rest);
      }
      case 'wrong_nonce':
        return sign({ ...claims, nonce: 'attacker-chosen-nonce' });
      case 'replay':
        // The whole, genuinely signed ID token of an earlier login (its nonce is stale).
        if (!previousIdToken) throw new Error('no earlier ID token to replay');
        return previousIdToken;
      case 'drop':
        return undefined;
      default:
        throw new Error(`unknown tamper mode ${mode}`);
    }
  }

  provider.use(async (ctx, next) => {
    await next();
    if (ctx.oidc?.route !== 'token' || ctx.status !== 200 || !ctx.body?.id_token) return;
    const genuine = ctx.body.id_token;
    if (tamper) {
      const mode = tamper;
      tamper = null;
      const forged = await forge(genuine, mode);
      console.log(`idp: tampered ID token (${mode})`);
      if (forged === undefined) delete ctx.body.id_token;
      else ctx.body.id_token = forged;
    }
    previousIdToken = genuine;
  });

  routes.set('/__test__/tamper', async (req, res) => {
    if (req.method !== 'POST') {
      res.writeHead(405);
      return res.end();
    }
    const form = await readForm(req);
    tamper = form.get('mode');
    res.writeHead(204);
    return res.end();
  });
}
